"""InferenceSettings: every rule of backend, dtype, device, threads, streams, batch size and
photo workers checked once, in one line naming the keyword or the command-line option."""

from __future__ import annotations

import dataclasses
import re

import pytest

from faceattrs.exceptions import FaceattrsError
from faceattrs.photo.config import PhotoConfig
from faceattrs.predict import FaceAnalyzer
from faceattrs.settings import InferenceSettings


@pytest.mark.parametrize(
    "kw, words",
    [
        ({"backend": "tensorrt"}, "unknown backend 'tensorrt'; use one of torch, onnx"),
        ({"backend": "torch", "dtype": "int8"}, "int8 runs on the onnx backend (backend='onnx'"),
        ({"backend": "onnx", "dtype": "bf16"}, "the onnx backend runs fp32 or int8 graphs"),
        ({"dtype": "fp16"}, "unknown dtype 'fp16'; use one of fp32, bf16"),
        ({"dtype": "int8", "device": "cuda"}, "the onnx backend runs on the CPU, not 'cuda'"),
        ({"threads": 0}, "threads must be a whole number of at least 1, got 0"),
        ({"streams": 1.5}, "streams must be a whole number of at least 1, got 1.5"),
        ({"streams": True}, "streams must be a whole number of at least 1, got True"),
        ({"batch_size": 0}, "batch size must be at least 1, got 0"),
        ({"photo_workers": "fork"}, "photo_workers must be one of auto, threads, processes"),
    ],
)
def test_each_rule_is_one_error_naming_the_keyword(kw, words):
    with pytest.raises(FaceattrsError) as e:
        InferenceSettings(**kw)
    assert words in str(e.value) and "\n" not in str(e.value)


@pytest.mark.parametrize(
    "kw, words",
    [
        ({"threads": 0}, "--threads must be at least 1, got 0 (leave it out to use all)"),
        ({"batch_size": 0}, "--batch-size must be at least 1, got 0"),
        ({"dtype": "fp16"}, "--dtype must be fp32, bf16 or int8, got 'fp16'"),
        ({"backend": "torch", "dtype": "int8"}, "leave out --backend torch"),
        ({"backend": "onnx", "dtype": "bf16"}, "the onnx backend runs on the CPU, in fp32 or int8"),
        ({"backend": "onnx", "device": "cuda"}, "--device and --dtype bf16 are the torch"),
        ({"dtype": "int8", "device": "cuda"}, "--dtype int8 runs on the CPU (onnxruntime)"),
    ],
)
def test_from_options_each_rule_names_the_option(kw, words):
    with pytest.raises(FaceattrsError, match=re.escape(words)):
        InferenceSettings(**kw, options=True)


def test_defaults_backend_from_dtype_and_replace_checks_again():
    s = InferenceSettings()
    assert (s.backend, s.dtype, s.photo) == ("torch", "fp32", PhotoConfig())
    assert InferenceSettings(dtype="int8").backend == "onnx"
    assert dataclasses.replace(s, threads=2).threads == 2
    with pytest.raises(FaceattrsError, match="threads must be"):
        dataclasses.replace(s, threads=-1)


def test_analyzer_takes_settings_or_keywords_not_both():
    with pytest.raises(FaceattrsError, match=r"give settings or keyword options \(batch_size\)"):
        FaceAnalyzer("no-such-run", InferenceSettings(), batch_size=2)
    # the keywords keep the torch backend: int8 needs backend="onnx", as before
    with pytest.raises(FaceattrsError, match="int8 runs on the onnx backend"):
        FaceAnalyzer("no-such-run", dtype="int8")

import numpy as np, json, sys
from sklearn.linear_model import LogisticRegression
from sklearn.preprocessing import StandardScaler
d = np.load('/work/wtdlib/local/descriptors.npz', allow_pickle=False)
names = [str(n).split('/')[-1] for n in d['names']]
idx = {n: i for i, n in enumerate(names)}
p = np.load('local/prepared_rgb96/faces.npz')
rows = np.array([idx[str(n)] for n in p['names']])
X = d['descriptor'][rows]; split = p['split']
for head in ('gender', 'ethnicity'):
    y = p[head]
    for C in (0.1, 1.0, 10.0):
        sc = StandardScaler().fit(X[split == 0])
        clf = LogisticRegression(C=C, max_iter=2000).fit(sc.transform(X[split == 0]), y[split == 0])
        acc = (clf.predict(sc.transform(X[split == 1])) == y[split == 1]).mean()
        print(head, C, round(acc, 4), flush=True)

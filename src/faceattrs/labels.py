"""Label names and input geometry shared by every stage."""

IMAGE_SIZE = 48  # faces are 48x48 grayscale, as in the public CSV
GENDERS = ("Male", "Female")  # CSV code 0 = male, 1 = female
ETHNICITIES = ("White", "Black", "Asian", "Indian", "Other")  # CSV codes 0..4
SPLITS = ("train", "val", "test")  # codes 0, 1, 2 in the prepared ``split`` array
AGE_RANGE = (1, 120)  # valid ages in years, inclusive

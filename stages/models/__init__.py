"""The models the stages train and run: the student, the discriminators, decoding, and the labelled data they read."""

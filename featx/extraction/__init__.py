"""Stage 1: a frozen pretrained backbone over a folder of images, into the feature cache."""

"""`python -m sample`: generate images from a trained model (see sample/__main__.py; logic in ldm_lite.generate)."""

"""qualiclip: QualiCLIP no-reference image quality assessment.

Score images with the authors' released weights or your own, train the model from pristine
images, evaluate against human opinion scores, and scale scoring out.
"""

__version__ = "0.1.0"

"""Losses, each taking logits, targets and plain weights (nothing from the params schema).

- ``classification``: the classifier's BCE + Focal Tversky (``focal_tversky``);
- ``segmentation``: the segmenter's Dice + Lovasz + BCE head, plus the tile-label terms of ``constraints``
  (multiple-instance pooling, size constraint) when they are weighted.
"""

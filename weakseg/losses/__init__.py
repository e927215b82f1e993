"""Losses: Focal Tversky for the classifier, Dice + Lovasz + BCE head for the segmenter."""

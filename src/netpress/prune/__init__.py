"""Pruning: mask maths (:mod:`.masks`) and unstructured magnitude pruning (:mod:`.unstructured`)."""

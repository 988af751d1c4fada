"""Inference that works for any model/guide pair; installed as ``pvae.inference``."""

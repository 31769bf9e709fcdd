"""Data: raw triples -> validated rows -> token ids with span roles (response / witness) -> datasets.Dataset.

readers (file formats), rawdata (one validated row or FILE:LINE), template and tokens (the training format and its
six structural tokens), packing, prepare (the cached, tokenized set), splits (leave-domains-out).
May import: the root helpers rundir and recipe_yaml. Never train/, study/ or release/.
"""

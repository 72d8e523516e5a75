"""The landmark schemes and what every part computes with them: the STAR loss family
and its term registry, the soft-argmax decoder, NME/FR/AUC metrics, mappings between
schemes, and the per-face output records (JSON/CSV helpers).
"""

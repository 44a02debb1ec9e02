"""Self-supervised objectives that pretrain the shared encoder (installed as ``omnienc.pretext``).

Mask-guided in-context segmentation (MASS, https://arxiv.org/abs/2311.17864 is the task family;
see DESIGN.md) and a contrastive objective on two overlapping views.
"""

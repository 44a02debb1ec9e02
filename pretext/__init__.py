"""Self-supervised objectives that pretrain the shared encoder (installed as ``omnienc.pretext``).

Mask-guided in-context segmentation (MASS: Gao et al., "Learning Generalizable 3D Medical Image
Representations from Mask-Guided Self-Supervision", CVPR 2026, https://arxiv.org/abs/2603.13660)
and a contrastive objective on two overlapping views.
"""

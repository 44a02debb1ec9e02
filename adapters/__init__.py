"""Heads on a frozen encoder (installed as ``omnienc.adapters``), one subpackage per adapter.

* :mod:`omnienc.adapters.classification`: features, linear / kNN / attention-pool probes, heads,
  metrics and the end-to-end baselines;
* :mod:`omnienc.adapters.segmentation`: the FPN decoder and the few-shot evaluation helpers;
* :mod:`omnienc.adapters.language`: the projector into a causal language model, paired data;
* :mod:`omnienc.adapters.latent`: UMAP maps, their structure metrics and the HTML page.

Adapters import :mod:`omnienc` only, never :mod:`omnienc.pretext`: the exported encoder
checkpoint is the bridge between pretraining and reuse. (Few-shot segmentation with the
pretext head, which loads that head from the same checkpoint, is
:mod:`omnienc.pretext.segment`, not an adapter.)
"""

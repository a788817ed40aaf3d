"""Multi-scale descriptor extraction: images -> ``(N, D)`` float32, L2-normalised rows.

Each module owns one step; import a name from the module that defines it:

- :mod:`~apretrieval.extraction.settings`: the default scales and image size, and the check
  of a scale list (no torch: the command line reads its defaults from here).
- :mod:`~apretrieval.extraction.images`: ``ImageFiles`` (files, optional crop boxes, longer
  side capped) and ``list_images`` (the image files of a folder).
- :mod:`~apretrieval.extraction.multiscale`: one batch of same-size images at several scales,
  combined by the signed generalized mean (``multiscale_descriptors``, ``combine_scales``).
- :mod:`~apretrieval.extraction.loop`: the batched loop with overlapped decoding
  (``Extractor``, the writer API: fill chosen rows of an array) and ``extract_descriptors``
  (all images into memory).
- :mod:`~apretrieval.extraction.resumable`: ``extract_to_file``, the resumable, sharded
  extraction into the descriptor file of :mod:`apretrieval.descriptors`.
"""

"""From slides to patches: stain normalization (``stain``, ``normalization``), registration of spots
to their tissue (``registration``), the patch store (``patch_store``, ``patch_extraction``) and a split
of it as arrays (``patch_set``)."""

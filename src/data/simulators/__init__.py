"""Simulated slides: the embedded default (``compartments``), the held-out family (``cells``), the
family switch (``families``) and the export as labs hold Visium data (``visium_export``)."""

"""Slides and patches, in three rooms: ``slides`` reads and writes slides (the competition's layout,
Space Ranger and AnnData, whole-slide images, barcodes, predictions), ``simulators`` makes the embedded
data and its lab export, ``preprocessing`` turns slides into patches (stain, registration, patch
store); ``spatial`` is the spot geometry they share. Knows nothing of models, training or studies."""

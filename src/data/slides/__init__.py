"""Reading and writing slides: the project's HDF5 layout (``layout``) and its checks, Visium slides as
labs hold them (``visium``, ``barcodes``, ``ingestion``), whole-slide images (``wsi`` reads, ``wsi_write``
writes), truth files and prediction files."""

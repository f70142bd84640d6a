"""Spatial cell-abundance AutoML: H&E patches around spatial-transcriptomics spots -> 35 abundances."""

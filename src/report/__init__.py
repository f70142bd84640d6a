"""Pictures and tables of predictions and data sets."""

"""What every layer shares: typed params checked at load, user errors, file helpers, shared
locations and devices. Imports nothing of the project."""

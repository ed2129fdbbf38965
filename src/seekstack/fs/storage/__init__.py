"""Storage service: a chunk engine on local disk and the CRAQ write/read/resync paths."""

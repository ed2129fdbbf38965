"""The metadata service: POSIX namespace over a transactional KV store (INOD/DENT/INOS), file layouts."""

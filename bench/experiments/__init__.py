"""Ad-hoc measurements on a plain redis-server that guide design changes (see bench/README.md)."""

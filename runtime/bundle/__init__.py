"""Bundle I/O: manifest, reader, checksums and path safety."""

"""`madlens audit list | show ID | export`: read the server's SQLite audit log."""

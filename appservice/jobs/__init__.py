"""Background work run as tasks in the server's loop, coordinated through the database."""

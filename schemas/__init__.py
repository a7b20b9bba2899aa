"""Every data contract of the project, declared once."""

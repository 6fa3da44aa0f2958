"""rapidphoto_relay."""

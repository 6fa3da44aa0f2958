"""rapidphoto_worker."""

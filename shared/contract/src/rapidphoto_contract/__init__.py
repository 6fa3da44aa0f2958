"""rapidphoto_contract."""

"""rapidphoto_tools: the enqueue client, the ``rapidphoto`` CLI and the simulated pipeline."""

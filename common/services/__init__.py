"""What hangs off a job's end: webhooks, sweeps and their grids. They read what fleet.lifecycle wrote; fleet never imports them."""

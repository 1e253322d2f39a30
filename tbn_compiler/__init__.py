"""tbn_compiler."""

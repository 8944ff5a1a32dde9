"""`mmae demo` and `mmae demo-data`: the synthetic corpus, a loopback server, the whole path end to end."""

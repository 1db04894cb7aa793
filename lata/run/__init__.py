"""One job (family -> merge -> evaluate -> run directory), the results store and resume, caches,
fingerprints by content, the search objective."""

"""Bulk client: classify a folder of images through /jobs or concurrent /cls calls."""

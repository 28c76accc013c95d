"""One module per engine; engine SDKs are imported only inside their own module."""

"""The network: HTTP/1.1 of our own (http), credentials and tokens (auth), the one retry loop (retry), downloads
with Range resume (download)."""

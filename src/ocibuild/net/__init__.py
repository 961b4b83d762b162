"""The network, under the registry client and the downloads of inputs: HTTP/1.1 of our own (http), connections,
proxies and TLS settings per host (session), credentials and tokens (auth), the one retry loop (retry), and
downloads with Range resume into the store (download)."""

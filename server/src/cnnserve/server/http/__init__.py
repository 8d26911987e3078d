"""The KServe v2 / Triton REST (HTTP/JSON) front end: a thin layer over the gRPC servicer."""

"""The .proto files of tlserve's gRPC APIs, installed as package data of ``tlserve.proto`` so that clients in
other languages can be generated from an installed tlserve: ``importlib.resources.files("tlserve.proto")``.
The files import each other as ``tlserve/server/pb/<path>``: map that prefix to this folder (protoc
``-Itlserve/server/pb=<this folder>``), as scripts/gen_proto.py does."""

"""stillroom.v1: the generated API code (messages and gRPC stubs), built from the .proto files here.

Regenerate with `make proto` (python -m stillroom.services.protogen); tests/unit/test_protogen.py checks that
the committed code matches the .proto files.
"""

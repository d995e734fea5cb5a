"""OTLP trace receivers behind TLS for the tests, as managed backends stand: gRPC or
HTTP/protobuf, optionally requiring a client certificate signed by CLIENT_CA (mutual TLS).

Prints "<trace id> <span name>" per span and, per request,
"request encoding=<grpc-encoding or Content-Encoding> api-key=<header> client=<client CN>".

Usage: python tls_receiver.py grpc|http PORT CERT KEY [CLIENT_CA]
(needs grpcio and opentelemetry-proto)."""
import gzip
import ssl
import sys
from concurrent import futures
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

from opentelemetry.proto.collector.trace.v1 import trace_service_pb2

kind, port, cert_file, key_file = sys.argv[1], int(sys.argv[2]), sys.argv[3], sys.argv[4]
client_ca = sys.argv[5] if len(sys.argv) > 5 else None


def report(request, encoding, api_key, client):
    print(f"request encoding={encoding} api-key={api_key} client={client}", flush=True)
    for rs in request.resource_spans:
        for ss in rs.scope_spans:
            for s in ss.spans:
                print(s.trace_id.hex(), s.name, flush=True)


if kind == "grpc":
    import grpc
    from opentelemetry.proto.collector.trace.v1 import trace_service_pb2_grpc

    class Svc(trace_service_pb2_grpc.TraceServiceServicer):
        def Export(self, request, context):
            meta = dict(context.invocation_metadata())
            cn = "-"
            for k, v in (context.auth_context() or {}).items():
                if k == "x509_common_name" and v:
                    cn = v[0].decode()
            report(request, meta.get("grpc-encoding", "identity"), meta.get("api-key", "-"), cn)
            return trace_service_pb2.ExportTraceServiceResponse()

    server = grpc.server(futures.ThreadPoolExecutor(max_workers=2))
    trace_service_pb2_grpc.add_TraceServiceServicer_to_server(Svc(), server)
    creds = grpc.ssl_server_credentials(
        [(open(key_file, "rb").read(), open(cert_file, "rb").read())],
        root_certificates=open(client_ca, "rb").read() if client_ca else None,
        require_client_auth=bool(client_ca),
    )
    server.add_secure_port(f"127.0.0.1:{port}", creds)
    server.start()
    print("listening", flush=True)
    server.wait_for_termination()
else:
    class Handler(BaseHTTPRequestHandler):
        def do_POST(self):
            body = self.rfile.read(int(self.headers.get("Content-Length", "0")))
            encoding = self.headers.get("Content-Encoding", "identity")
            if encoding == "gzip":
                body = gzip.decompress(body)
            req = trace_service_pb2.ExportTraceServiceRequest()
            req.ParseFromString(body)
            cn = "-"
            peer = self.connection.getpeercert()
            if peer:
                for rdn in peer.get("subject", ()):
                    for k, v in rdn:
                        if k == "commonName":
                            cn = v
            report(req, encoding, self.headers.get("api-key", "-"), cn)
            out = trace_service_pb2.ExportTraceServiceResponse().SerializeToString()
            self.send_response(200)
            self.send_header("Content-Type", "application/x-protobuf")
            self.send_header("Content-Length", str(len(out)))
            self.end_headers()
            self.wfile.write(out)

        def log_message(self, *args):
            pass

    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.load_cert_chain(cert_file, key_file)
    if client_ca:
        ctx.verify_mode = ssl.CERT_REQUIRED
        ctx.load_verify_locations(client_ca)
    httpd = ThreadingHTTPServer(("127.0.0.1", port), Handler)
    httpd.socket = ctx.wrap_socket(httpd.socket, server_side=True)
    print("listening", flush=True)
    httpd.serve_forever()

// Loads the Crux local API from its .proto files with @grpc/proto-loader (nothing generated) and
// opens a client on an agent's Unix socket, with @grpc/grpc-js and no channel option.
'use strict';
const path = require('path');
const grpc = require('@grpc/grpc-js');
const protoLoader = require('@grpc/proto-loader');

const DEFAULT_PROTO = path.join(__dirname, '..', '..', 'proto', 'proto');

function client(socket, protoDir = DEFAULT_PROTO) {
  const def = protoLoader.loadSync('crux/reeve/v1/reeve.proto', {
    includeDirs: [protoDir],
    keepCase: true,
    longs: Number,
    enums: String,
    defaults: true,
  });
  const pkg = grpc.loadPackageDefinition(def);
  return new pkg.crux.reeve.v1.Reeve('unix://' + path.resolve(socket), grpc.credentials.createInsecure());
}

// Calls a unary method as a promise, with a deadline.
function call(c, method, req, seconds = 10) {
  const deadline = new Date(Date.now() + seconds * 1000);
  return new Promise((resolve, reject) =>
    c[method](req, { deadline }, (err, res) => (err ? reject(err) : resolve(res))));
}

module.exports = { client, call, grpc, DEFAULT_PROTO };

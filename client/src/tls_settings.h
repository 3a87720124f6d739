#pragma once
// The client's side of a session's TLS and proxy settings: reading the
// Options' certificate files into the settings' PEM text, and checking what
// a worker would otherwise only find out when a statement fails.

#include "gatherer/gatherer.h"

namespace gatherer::client {

// Reads options.cacert (a PEM file, or a directory: every file in it that
// holds a certificate), options.cert and options.key into settings.tls_*.
// InvalidArgument naming the file when one cannot be read or holds no PEM of
// the kind expected.
Status LoadTlsFiles(const Options& options, SessionSettings& settings);

// The TLS and proxy settings, however they were set: PEM text that holds a
// certificate (a key), a certificate and key together, a proxy URL with a
// scheme libcurl speaks, no control bytes anywhere.
Status ValidateTlsAndProxy(const SessionSettings& settings);

}  // namespace gatherer::client

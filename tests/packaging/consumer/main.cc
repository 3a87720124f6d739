// Builds against the installed public headers only and checks a statement
// without any network: the package is usable as installed.
#include <cstdio>

#include <gatherer/gatherer.h>

int main() {
  gatherer::Options options;
  const gatherer::Status ok = gatherer::ValidateStatement(gatherer::Get("https://api.example/a"), options.settings);
  const gatherer::Status bad = gatherer::ValidateStatement(gatherer::Get("file:///etc/passwd"), options.settings);
  std::printf("workers=%d valid=%d refused=%d\n", options.workers, ok.ok() ? 1 : 0, bad.ok() ? 0 : 1);
  return ok.ok() && !bad.ok() && options.workers == 25 ? 0 : 1;
}

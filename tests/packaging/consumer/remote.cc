// Linked with gatherer::remote: a Gatherer needs a broker address, and one
// without says so at once, naming what to do.
#include <cstdio>
#include <string>

#include <gatherer/gatherer.h>

int main() {
  try {
    gatherer::Gatherer g;
  } catch (const gatherer::Error& e) {
    const std::string what = e.what();
    std::printf("refused: %s\n", e.what());
    return e.code() == gatherer::StatusCode::kFailedPrecondition && what.find("Options::broker") != std::string::npos
               ? 0
               : 1;
  }
  std::printf("an embedded Gatherer started without the embedded mode\n");
  return 1;
}

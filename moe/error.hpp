// moetune's one exception type: every user-facing failure (bad config key, malformed
// data line, corrupt checkpoint) is thrown as moetune::Error with a message that names
// the file, line or key, and is turned into "error: ..." plus exit code 1 by the CLI.
#pragma once
#include <stdexcept>
#include <string>

namespace moetune {

struct Error : std::runtime_error {
  explicit Error(const std::string& what) : std::runtime_error(what) {}
};

}  // namespace moetune

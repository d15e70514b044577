// Checkpoint manifests: manifest.json lists every file of a checkpoint directory with
// its size and SHA-256, written last (just before the directory is renamed into
// place). A checkpoint whose manifest is missing, or with a missing, extra-sized or
// altered file, is never loaded silently.
#pragma once
#include <string>

namespace moetune {

// Writes <dir>/manifest.json covering every regular file of dir (except itself).
void write_manifest(const std::string& dir);
// Throws moetune::Error naming the checkpoint and the file that fails the check.
void verify_manifest(const std::string& dir);

}  // namespace moetune

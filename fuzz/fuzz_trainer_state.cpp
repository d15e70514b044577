// Fuzzes trainer_state.json as a resumed run reads it: io/checkpoint.hpp
// load_trainer_state, then the field checks of train/trainer.hpp
// read_train_resume_state (train, sft) and read_rl_resume_state (rl).
#include "fuzz/fuzz_util.hpp"
#include "io/checkpoint.hpp"
#include "train/trainer.hpp"

using namespace moetune;

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  const std::string dir = fuzz::scratch_subdir("ckpt");
  fuzz::write_input("ckpt/trainer_state.json", data, size);
  fuzz::parse_or_reject([&] { (void)load_trainer_state(dir); });
  fuzz::parse_or_reject([&] {
    const TrainResumeState s = read_train_resume_state(dir);
    if (s.step < 0 || s.epoch < 0 || s.row < 0) fuzz::invariant_failed("negative train resume state");
  });
  fuzz::parse_or_reject([&] {
    const RlResumeState s = read_rl_resume_state(dir);
    if (s.step < 0 || s.epoch < 0 || s.pos < 0) fuzz::invariant_failed("negative rl resume state");
  });
  return 0;
}

// moetune command-line entry point (placeholder until the trainer lands).
#include <cstdio>
int main() { std::puts("moetune"); return 0; }


01KE0JER000000000000000009workerstaging"Gsha256:ccccccccccccccccccccccccccccccccccccccccccccccccccccccccccccccccB
VERSIONv2RË ÙZÄÄ`zW
%https://github.com/example/worker.gitmain(0000000000000000000000000000019b81276000ÄÄ¿ùâ∏3